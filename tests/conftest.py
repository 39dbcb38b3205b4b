"""Test-wide setup: eight fake CPU devices, so sharding is tested on every run.

The flag must be set before JAX initializes its backends, hence at import time here.
"""
import contextlib
import fcntl
import os
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Compiling is most of the suite's time on CPU: tests (and the subprocesses they
# start, which inherit this environment) share compiled programs through one cache.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), f'ldm_jax_test_cache_{os.getuid()}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory) -> str:
  """A TFDS data dir with the embedded `digits` dataset prepared once per session."""
  import tensorflow_datasets as tfds

  import ldm_jax.datasets  # noqa: F401  (registers `digits`)

  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('digits', data_dir=data_dir).download_and_prepare()
  return data_dir


@pytest.fixture
def tiny_config(digits_data_dir):
  """configs/tiny.py reading the session's prepared digits."""
  from configs import tiny

  config = tiny.get_config()
  config.data.data_dir = digits_data_dir
  return config


@contextlib.contextmanager
def _flock(path: str, operation: int):
  with open(path, 'a') as f:
    fcntl.flock(f, operation)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """Tests marked `alone` run while no other test worker is inside a test.

  Processes that must meet within a deadline (jax.distributed's collectives give up
  after 30 s) are starved by a second worker's compiles on a 2-core machine. Every test
  holds a shared lock, an `alone` test an exclusive one; a waiting `alone` test holds
  the turnstile, so no new test starts before it has run.
  """
  run_id = os.environ.get('PYTEST_XDIST_TESTRUNUID')
  if not run_id:  # One process: nothing runs beside the test.
    yield
    return
  base = os.path.join(tempfile.gettempdir(), f'ldm_jax_tests_{os.getuid()}_{run_id}')
  if item.get_closest_marker('alone'):
    with _flock(base + '.turnstile', fcntl.LOCK_EX), _flock(base + '.lock', fcntl.LOCK_EX):
      yield
  else:
    with _flock(base + '.turnstile', fcntl.LOCK_EX):
      pass
    with _flock(base + '.lock', fcntl.LOCK_SH):
      yield
