"""`python -m ldm_jax.main|bench` restart once with huge pages for XLA's large buffers."""
import os
import subprocess
import sys

import pytest

from ldm_jax import host_memory, xla_flags

_MADVISE, _GLIBC = 'madvise', (2, 36)
_ON = 'glibc.malloc.hugetlb=1'


def test_the_tunable_is_added_only_where_it_applies():
  add = host_memory.tunables_with_huge_pages
  assert add({}, _MADVISE, _GLIBC) == _ON
  assert add({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, _MADVISE, _GLIBC) == (
      'glibc.malloc.arena_max=2:' + _ON)
  # The user's own setting wins, and ldm_jax's defaults can be turned off.
  assert add({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, _MADVISE, _GLIBC) is None
  assert add({xla_flags.OPT_OUT_VARIABLE: 'off'}, _MADVISE, _GLIBC) is None
  # Where the kernel or the C library would not act on it.
  for mode in ('always', 'never', None):
    assert add({}, mode, _GLIBC) is None
  assert add({}, _MADVISE, (2, 34)) is None and add({}, _MADVISE, None) is None


def test_only_the_entry_points_restart_and_only_once(monkeypatch):
  monkeypatch.setattr(host_memory, 'transparent_huge_pages', lambda: _MADVISE)
  monkeypatch.setattr(host_memory, 'glibc_version', lambda: _GLIBC)
  calls = []
  execve = lambda path, argv, env: calls.append((path, argv, env))
  command = ['python3', '-u', '-X', 'dev', '-m', 'ldm_jax.bench', '--config=c.py']
  environ = {'PATH': '/bin'}
  assert host_memory.restart_with_huge_pages(environ, command, '-m', execve)
  assert calls == [(sys.executable, [sys.executable, *command[1:]],
                    {'PATH': '/bin', 'GLIBC_TUNABLES': _ON})]
  # The restarted process finds its tunable and goes on.
  assert not host_memory.restart_with_huge_pages(calls[0][2], command, '-m', execve)
  # Anything else that imports ldm_jax is never restarted.
  for command, argv0 in ((['python3', '-m', 'pytest', 'tests'], '-m'),
                         (['python3', '-c', 'import ldm_jax'], '-c'),
                         (['python3', 'run.py', '-m', 'ldm_jax.main'], 'run.py'),
                         (['python3', '-m', 'ldm_jax.main'], '/x/ldm_jax/main.py')):
    assert not host_memory.restart_with_huge_pages({}, command, argv0, execve)
  assert len(calls) == 1


def test_the_bench_entry_point_reports_the_pages_it_restarted_with():
  environ = {k: v for k, v in os.environ.items()
             if k not in ('GLIBC_TUNABLES', xla_flags.OPT_OUT_VARIABLE)}
  expected = host_memory.tunables_with_huge_pages(
      environ, host_memory.transparent_huge_pages(), host_memory.glibc_version())
  # --parts=none stops the benchmark with a usage error right after its first line.
  run = subprocess.run([sys.executable, '-m', 'ldm_jax.bench', '--config=configs/tiny.py',
                        '--parts=none'], env=environ, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 1 and 'unknown --parts' in run.stderr, run.stderr[-2000:]
  first = run.stdout.splitlines()[0]
  if expected is None:  # This kernel or C library would not use the tunable.
    assert first.startswith('host memory: ') and _ON not in first, first
  else:
    assert first == f'host memory: huge pages for large buffers (GLIBC_TUNABLES={expected})'


_TEMPORARY_FAULTS = r'''
import resource, jax, jax.numpy as jnp
import ldm_jax
x, w = jnp.ones((8192, 2048)), jnp.ones((2048, 16))
f = jax.jit(lambda x, w: jnp.sin(x) @ w)  # sin(x), 64 MiB, is a temporary of each call.
f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x, w).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
'''


@pytest.mark.skipif(host_memory.transparent_huge_pages() != 'madvise'
                    or (host_memory.glibc_version() or (0, 0)) < host_memory.GLIBC_MIN_VERSION,
                    reason='huge pages on request need THP in madvise mode and glibc >= 2.35')
def test_huge_pages_take_the_page_faults_out_of_each_call():
  """Each call of a compiled program maps its 64 MiB temporary afresh: 16,384 page faults
  with 4 KiB pages, ~1/25 of that with huge pages."""
  faults = {}
  for tunables in ('glibc.malloc.hugetlb=0', _ON):
    run = subprocess.run([sys.executable, '-c', _TEMPORARY_FAULTS], capture_output=True,
                         text=True, timeout=300, env={**os.environ, 'GLIBC_TUNABLES': tunables})
    assert run.returncode == 0, run.stderr[-2000:]
    faults[tunables] = float(run.stdout.split()[-1])
  assert faults['glibc.malloc.hugetlb=0'] > 0.9 * 64 * 2**20 / 4096, faults
  assert faults[_ON] * 10 < faults['glibc.malloc.hugetlb=0'], faults
