"""Fault injection: checkpoints that cannot lie, failures that stop, one run per workdir.

Most faults are injected in-process against `ldm_jax.checkpointing` with a tiny
state; three end-to-end runs of `python -m ldm_jax.main` check what a user sees.
"""
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ldm_jax import checkpointing, config_check, logs, modes, sharding, stages, workdir_lock
from ldm_jax import images as image_io
from ldm_jax.errors import UserError
from ldm_jax.train_state import create_train_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
READ_ONLY_DIR = '/sys/kernel'  # mkdir there fails even for root (EPERM).


def _state(step: int, value: float = 0.0):
  # Random values: incompressible, so the data files are as large as the arrays.
  kernel = jax.random.normal(jax.random.PRNGKey(step), (128, 256), jnp.float32)
  params = {'dense': {'kernel': kernel,
                      'bias': jnp.arange(256, dtype=jnp.float32) * step},
            'scale': jnp.full((16,), value + step, jnp.bfloat16)}
  state = create_train_state(params, optax.adam(1e-3), jax.random.PRNGKey(step))
  return state.replace(step=jnp.asarray(step, jnp.int32))


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  """A directory with verified checkpoints at steps 1, 2, 3 (copied per test)."""
  directory = tmp_path_factory.mktemp('ckpts') / 'checkpoints'
  manager = checkpointing.make_manager(str(directory), keep=5)
  for step in (1, 2, 3):
    checkpointing.save(manager, _state(step), {'diffusion': {'prediction_type': 'eps'}})
  checkpointing.finish(manager)
  return directory


@pytest.fixture
def checkpoints(written, tmp_path):
  directory = tmp_path / 'checkpoints'
  shutil.copytree(written, directory)
  return directory


def _abstract():
  return jax.eval_shape(lambda: _state(0))


def _data_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest array-data file of a checkpoint step."""
  files = [p for p in step_dir.rglob('*') if p.is_file() and p.parent.name == 'd']
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  path = _data_file(step_dir)
  os.truncate(path, path.stat().st_size // 2)


def _overwrite_64_bytes(step_dir):
  path = _data_file(step_dir)
  with open(path, 'r+b') as f:
    f.seek(path.stat().st_size // 2)
    f.write(bytes(range(64)))


def _wrong_checksum(step_dir):  # Reads fine; only the checksums can tell.
  path = step_dir / '_CHECKPOINT_METADATA'
  metadata = json.loads(path.read_text())
  metadata['custom_metadata']['ldm_jax']['arrays'][1][4] ^= 1
  path.write_text(json.dumps(metadata))


FAULTS = {
    'truncated_data': _truncate,
    'overwritten_bytes': _overwrite_64_bytes,
    'wrong_checksum': _wrong_checksum,
    'missing_metadata': lambda d: (d / '_CHECKPOINT_METADATA').unlink(),
    'garbage_metadata': lambda d: (d / '_CHECKPOINT_METADATA').write_bytes(b'\x00garbage{'),
    'garbage_array_metadata': lambda d: (d / 'default' / '_METADATA').write_text('{"tree'),
    'deleted_default': lambda d: shutil.rmtree(d / 'default'),
    'empty_step_dir': lambda d: (shutil.rmtree(d), d.mkdir()),
}


@pytest.mark.parametrize('fault', sorted(FAULTS))
def test_unusable_newest_checkpoint_falls_back_with_one_warning(checkpoints, fault, caplog):
  FAULTS[fault](checkpoints / '3')
  manager = checkpointing.make_manager(str(checkpoints), keep=5)
  with caplog.at_level(logging.WARNING):
    state = checkpointing.restore(manager, _abstract())
  assert int(state.step) == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               jax.device_get(_state(2).params))
  # What a user of `ldm_jax.main` sees: its log filter applied.
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING and logs.quiet_libraries(r)]
  assert len(warnings) == 1 and 'checkpoints/3 is unusable' in warnings[0], warnings
  assert sorted(os.listdir(checkpoints)) == ['1', '2', '3.corrupt']
  assert manager.all_steps() == [1, 2]


def test_read_only_restore_skips_without_moving(checkpoints):
  _overwrite_64_bytes(checkpoints / '3')
  manager = checkpointing.make_manager(str(checkpoints), keep=5, read_only=True)
  assert int(checkpointing.restore(manager, _abstract()).step) == 2
  assert sorted(os.listdir(checkpoints)) == ['1', '2', '3']


def test_checkpoint_of_another_model_is_a_mismatch_not_corruption(checkpoints):
  manager = checkpointing.make_manager(str(checkpoints), keep=5)
  other = jax.eval_shape(lambda: _state(0).replace(params={'dense': {'kernel': jnp.zeros(3)}}))
  with pytest.raises(UserError, match='does not match the configured model'):
    checkpointing.restore(manager, other)
  assert sorted(os.listdir(checkpoints)) == ['1', '2', '3']


def test_garbage_collection_keeps_the_newest_verified_checkpoint(checkpoints):
  _overwrite_64_bytes(checkpoints / '3')
  manager = checkpointing.make_manager(str(checkpoints), keep=2)
  state, restored = checkpointing.restore_or_init(manager, lambda: None, _abstract())
  assert restored and int(state.step) == 2
  checkpointing.save(manager, _state(4))
  checkpointing.finish(manager)
  assert manager.all_steps() == [2, 4]  # Not [1, ...]: 1 went, the verified 2 stayed.
  state = checkpointing.restore(manager, _abstract())
  assert int(state.step) == 4


@pytest.mark.parametrize('field', ['params', 'ema_params', 'opt_state'])
def test_non_finite_state_is_refused_and_names_the_last_finite_checkpoint(checkpoints, field):
  manager = checkpointing.make_manager(str(checkpoints), keep=5)
  checkpointing.save(manager, _state(4))  # Still being written when the NaN is found.
  state = _state(5)
  poisoned = jax.tree.map(lambda x: x.at[..., 0].set(jnp.nan) if x.ndim else x,
                          getattr(state, field))
  with pytest.raises(checkpointing.NonFiniteStateError,
                     match='state at step 5 has NaN.*last finite checkpoint: step 4'):
    checkpointing.save(manager, state.replace(**{field: poisoned}))
  assert manager.all_steps() == [1, 2, 3, 4]
  assert sorted(os.listdir(checkpoints)) == ['1', '2', '3', '4']  # No tmp dir left.


def test_checksums_agree_across_layouts():
  """Any mesh that holds the same values computes the same checksums (modular sums)."""
  state = _state(2)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(8), ('x',))
  split = jax.device_put(state.params['dense']['kernel'],
                         jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x')))
  sharded = state.replace(params={**state.params, 'dense': {**state.params['dense'],
                                                            'kernel': split}})
  assert checkpointing.describe(state) == checkpointing.describe(sharded)
  changed = state.params['dense']['kernel'].at[5, 7].add(1e-3)
  record = checkpointing.describe(state.replace(params={**state.params, 'dense': {
      **state.params['dense'], 'kernel': changed}}))[1]
  assert record != checkpointing.describe(state)[1]


def test_failed_write_raises_at_once(tmp_path):
  os.symlink(READ_ONLY_DIR, tmp_path / 'checkpoints')
  manager = checkpointing.make_manager(str(tmp_path / 'checkpoints'), keep=2)
  start = time.monotonic()
  with pytest.raises(checkpointing.CheckpointWriteError, match='cannot write checkpoint'):
    checkpointing.save(manager, _state(1))
  checkpointing.wait_all()  # Nothing left waiting.
  assert time.monotonic() - start < 30


# ------------------------------------------------------------------ config ----


def test_config_differences_list_model_fields_and_allow_budgets(tiny_config):
  stored = config_check.as_json(tiny_config)
  changed = tiny_config.copy_and_resolve_references()
  changed.diffusion.prediction_type = 'v'
  changed.diffusion.model.num_heads = 4
  changed.diffusion.num_train_steps = 99
  changed.train.checkpoint_every = 7
  changed.sample.num_steps = 3
  changed.data.data_dir = '/elsewhere'
  assert config_check.differences(stored, changed) == [
      'diffusion.model.num_heads: 2 → 4', 'diffusion.prediction_type: "eps" → "v"']
  # Stage 1 does not depend on stage-2 fields, and may be shared by runs of other seeds.
  changed.seed = 5
  changed.autoencoder.workdir = '/shared/stage1'
  assert config_check.differences(stored, changed, 'autoencoder') == []
  changed.autoencoder.model.latent_channels = 4
  assert config_check.differences(stored, changed, 'autoencoder') == [
      'autoencoder.model.latent_channels: 2 → 4']


def test_config_check_field_lists_name_fields_of_the_config(tiny_config):
  """A renamed config field must be renamed in these lists too, or it stops counting."""
  # pylint: disable=protected-access
  names = config_check._flatten(config_check.as_json(tiny_config))
  prefixes = (*config_check.MAY_CHANGE, *config_check.STAGE_FIELDS['autoencoder'],
              *(p for ps in config_check.STAGE_MAY_CHANGE.values() for p in ps))
  missing = [p for p in prefixes if not any(config_check._under(n, [p]) for n in names)]
  assert not missing, missing


def test_changed_prediction_type_is_refused_before_any_write(tiny_config, tmp_path):
  workdir = tmp_path / 'run'
  directory = workdir / 'diffusion' / 'checkpoints'
  manager = checkpointing.make_manager(str(directory), keep=2)
  checkpointing.save(manager, _state(2), tiny_config)
  checkpointing.finish(manager)
  (workdir / 'config.json').write_text(tiny_config.to_json_best_effort(indent=2))
  before = sorted(str(p) for p in workdir.rglob('*'))
  changed = tiny_config.copy_and_resolve_references()
  changed.diffusion.prediction_type = 'v'
  mesh = sharding.make_mesh(mesh_shape=tiny_config.mesh_shape)
  with pytest.raises(UserError, match=r'diffusion.prediction_type: "eps" → "v"'):
    modes._prepare_training(changed, str(workdir), mesh,  # pylint: disable=protected-access
                            stages.STAGES)
  assert sorted(str(p) for p in workdir.rglob('*')) == before
  assert json.loads((workdir / 'config.json').read_text())['diffusion']['prediction_type'] == 'eps'
  # An allowed change passes and keeps the earlier config.json.
  changed = tiny_config.copy_and_resolve_references()
  changed.diffusion.num_train_steps = 8
  modes._prepare_training(changed, str(workdir), mesh,  # pylint: disable=protected-access
                          stages.STAGES)
  assert json.loads((workdir / 'config.1.json').read_text())['diffusion']['num_train_steps'] == 4
  assert json.loads((workdir / 'config.json').read_text())['diffusion']['num_train_steps'] == 8


def test_non_positive_num_samples_is_an_error(tiny_config, tmp_path):
  with pytest.raises(UserError, match='--num_samples=-1'):
    modes.run('sample', tiny_config, str(tmp_path / 'run'), modes.Options(num_samples=-1))
  assert not (tmp_path / 'run').exists()


def test_sample_mode_names_never_replace_existing_samples(tmp_path):
  (tmp_path / 'samples_6.npz').write_bytes(b'training run')
  first = image_io.free_sample_names(str(tmp_path), 6)
  assert first == (f'{tmp_path}/grid_6_sample1.png', f'{tmp_path}/samples_6_sample1.npz')
  pathlib.Path(first[1]).write_bytes(b'')
  assert image_io.free_sample_names(str(tmp_path), 6)[1].endswith('samples_6_sample2.npz')


# -------------------------------------------------------------------- lock ----


def test_lock_refuses_a_second_holder_and_takes_over_a_stale_one(tmp_path):
  workdir = tmp_path / 'run'
  with workdir_lock.hold(str(workdir)):
    holder = json.loads((workdir / '.lock').read_text())
    assert holder['pid'] == os.getpid()
    with pytest.raises(UserError, match=f'in use by another run .*pid {os.getpid()}'):
      workdir_lock.acquire(str(workdir))
  assert not workdir.exists()  # Created for the run, left empty: removed.
  dead = subprocess.Popen(['true'])
  dead.wait()
  workdir.mkdir()
  (workdir / '.lock').write_text(json.dumps({'host': socket.gethostname(), 'pid': dead.pid}))
  with workdir_lock.hold(str(workdir)):
    assert json.loads((workdir / '.lock').read_text())['pid'] == os.getpid()
  assert workdir.exists() and not (workdir / '.lock').exists()


# ------------------------------------------------------------- end to end ----


def _run_main(*args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  start = time.monotonic()
  result = subprocess.run([sys.executable, '-m', 'ldm_jax.main', *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
  return result, time.monotonic() - start


def _assert_ends_with_one_error_line(result, pattern: str) -> None:
  assert result.returncode == 1, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith('error: '), result.stderr[-3000:]
  assert re.search(pattern, lines[-1]), lines[-1]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]


def _tiny_args(workdir, data_dir, *extra):
  return (f'--config={ROOT}/configs/tiny.py', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', '--config.train.checkpoint_every=1',
          '--config.train.log_every=1', *extra)


def test_e2e_nan_run_saves_nothing_non_finite(tmp_path, digits_data_dir):
  result, _ = _run_main(*_tiny_args(tmp_path / 'run', digits_data_dir,
                                    '--config.autoencoder.optim.learning_rate=1e39',
                                    '--config.autoencoder.optim.warmup_steps=0'))
  _assert_ends_with_one_error_line(
      result, r'state at step 1 has NaN or Inf.*last finite checkpoint: none')
  assert os.listdir(tmp_path / 'run' / 'autoencoder' / 'checkpoints') == []


def test_e2e_unwritable_checkpoint_dir_ends_with_one_error_line(tmp_path, digits_data_dir):
  (tmp_path / 'run' / 'autoencoder').mkdir(parents=True)
  os.symlink(READ_ONLY_DIR, tmp_path / 'run' / 'autoencoder' / 'checkpoints')
  # It used to wait forever (orbax's threads); the write failing itself raises within
  # seconds (test_failed_write_raises_at_once), the rest is start-up and one train step.
  result, _ = _run_main(*_tiny_args(tmp_path / 'run', digits_data_dir), timeout=300)
  _assert_ends_with_one_error_line(result, r'cannot write checkpoint .*/1: PermissionError')


def test_e2e_second_run_on_a_locked_workdir_stops_at_once(tmp_path, digits_data_dir):
  workdir = tmp_path / 'run'
  holder = subprocess.Popen(['sleep', '60'])
  try:
    workdir.mkdir()
    (workdir / '.lock').write_text(json.dumps({'host': socket.gethostname(), 'pid': holder.pid}))
    result, _ = _run_main(*_tiny_args(workdir, digits_data_dir))
  finally:
    holder.kill()
  _assert_ends_with_one_error_line(result, rf'in use by another run \(host .*, pid {holder.pid}\)')
  assert sorted(os.listdir(workdir)) == ['.lock']
